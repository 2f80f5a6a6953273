//! containerd's Snapshots service and Mount type, generated once by
//! tonic-build 0.13 from `proto/` (scripts/gen-proto.sh) and checked in, so
//! that building needs no protoc.
#![allow(clippy::all, missing_docs, rustdoc::all)]

pub mod containerd {
    pub mod types {
        include!("proto/containerd.types.rs");
    }
    pub mod services {
        pub mod snapshots {
            pub mod v1 {
                include!("proto/containerd.services.snapshots.v1.rs");
            }
        }
    }
}
