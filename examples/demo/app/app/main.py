print("hello from the shoal demo app layer")
