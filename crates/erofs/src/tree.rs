//! The in-memory tree a build assembles from its sources, with OCI layer
//! semantics (whiteouts, opaque directories, hard links across layers).
//! Regular-file data is already in blobs by the time it reaches the tree;
//! the tree holds only metadata and chunk references.

use std::collections::BTreeMap;

/// Index of a node in [`Tree::nodes`]; hard links share one node.
pub type NodeId = usize;

/// Where one chunk of a regular file lives, in build-local terms (the blob
/// index is mapped to a device slot when the bootstrap is written).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    pub blob: u32,
    pub blkaddr: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    Dir(BTreeMap<Vec<u8>, NodeId>),
    /// `None` entries are holes (all-zero chunks).
    File {
        size: u64,
        chunks: Vec<Option<ChunkRef>>,
    },
    Symlink(Vec<u8>),
    /// Character or block device; `rdev` in the kernel's `new_encode_dev` form.
    Device(u32),
    /// FIFO or socket: the type is in the mode.
    Special,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Full `st_mode`, type bits included.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Full xattr names (`user.foo`, `system.posix_acl_access`) to values.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub meta: Meta,
    pub data: Data,
    /// The layer that wrote this node: whiteouts and opaque markers only
    /// hide what lower layers wrote.
    pub layer: usize,
}

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFSOCK: u32 = 0o140000;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// Why an entry could not be applied; the caller adds layer and entry name.
#[derive(Debug)]
pub enum ApplyError {
    NotDir(String),
    NoLinkTarget(String),
    LinkToDir(String),
    Name(String),
    /// A layer entry for the root itself (`./`) that is not a directory.
    RootNotDir,
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::NotDir(p) => write!(f, "parent {p:?} is not a directory"),
            ApplyError::NoLinkTarget(p) => write!(f, "hard link target {p:?} does not exist"),
            ApplyError::LinkToDir(p) => write!(f, "hard link target {p:?} is a directory"),
            ApplyError::Name(p) => write!(f, "invalid name {p:?}"),
            ApplyError::RootNotDir => write!(f, "the root can only be a directory"),
        }
    }
}

pub struct Tree {
    pub nodes: Vec<Node>,
    pub root: NodeId,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

/// Split a relative path into its components, refusing anything that could
/// escape the tree: absolute paths and `..`. `.` and empty components vanish.
pub fn split_path(path: &[u8]) -> Result<Vec<&[u8]>, String> {
    if path.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path contains '..'".into()),
            c if c.contains(&0) => return Err("path contains NUL".into()),
            c if c.len() > 255 => return Err("name longer than 255 bytes".into()),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn show(p: &[&[u8]]) -> String {
    String::from_utf8_lossy(&p.join(&b'/')).into_owned()
}

impl Tree {
    pub fn new() -> Self {
        let root = Node {
            meta: Meta {
                mode: S_IFDIR | 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                xattrs: BTreeMap::new(),
            },
            data: Data::Dir(BTreeMap::new()),
            layer: 0,
        };
        Tree {
            nodes: vec![root],
            root: 0,
        }
    }

    fn children(&self, id: NodeId) -> Option<&BTreeMap<Vec<u8>, NodeId>> {
        match &self.nodes[id].data {
            Data::Dir(c) => Some(c),
            _ => None,
        }
    }

    fn children_mut(&mut self, id: NodeId) -> Option<&mut BTreeMap<Vec<u8>, NodeId>> {
        match &mut self.nodes[id].data {
            Data::Dir(c) => Some(c),
            _ => None,
        }
    }

    /// Resolve a path without following symlinks.
    pub fn lookup(&self, comps: &[&[u8]]) -> Option<NodeId> {
        let mut cur = self.root;
        for c in comps {
            cur = *self.children(cur)?.get(*c)?;
        }
        Some(cur)
    }

    /// Walk to the parent directory of `comps`, creating missing directories
    /// (as OCI appliers do for layers that omit parents).
    fn parent_dir(&mut self, comps: &[&[u8]], layer: usize) -> Result<NodeId, ApplyError> {
        let mut cur = self.root;
        for (i, c) in comps[..comps.len() - 1].iter().enumerate() {
            let existing = self
                .children(cur)
                .ok_or_else(|| ApplyError::NotDir(show(&comps[..i])))?
                .get(*c)
                .copied();
            cur = match existing {
                Some(id) => id,
                None => {
                    let id = self.push(Node {
                        meta: Meta {
                            mode: S_IFDIR | 0o755,
                            uid: 0,
                            gid: 0,
                            mtime: 0,
                            mtime_nsec: 0,
                            xattrs: BTreeMap::new(),
                        },
                        data: Data::Dir(BTreeMap::new()),
                        layer,
                    });
                    self.children_mut(cur).unwrap().insert(c.to_vec(), id);
                    id
                }
            };
        }
        if self.children(cur).is_none() {
            return Err(ApplyError::NotDir(show(&comps[..comps.len() - 1])));
        }
        Ok(cur)
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Apply one layer entry. Whiteouts (`.wh.NAME`) and opaque markers
    /// (`.wh..wh..opq`) hide what lower layers wrote; a directory over a
    /// directory keeps its children; anything else replaces.
    pub fn apply(&mut self, comps: &[&[u8]], node: Node) -> Result<(), ApplyError> {
        let layer = node.layer;
        let Some(name) = comps.last() else {
            // The root itself: take its metadata, keep its children.
            if !matches!(node.data, Data::Dir(_)) || node.meta.mode & S_IFMT != S_IFDIR {
                return Err(ApplyError::RootNotDir);
            }
            self.nodes[self.root].meta = node.meta;
            return Ok(());
        };
        if *name == OPAQUE_MARKER {
            let dir = self.lookup_or_create_dir(&comps[..comps.len() - 1], layer)?;
            let nodes = &self.nodes;
            if let Data::Dir(children) = &self.nodes[dir].data {
                let keep: BTreeMap<_, _> = children
                    .iter()
                    .filter(|(_, &id)| nodes[id].layer >= layer)
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                self.nodes[dir].data = Data::Dir(keep);
            }
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(ApplyError::Name(show(comps)));
            }
            let parent = self.parent_dir(comps, layer)?;
            let lower = self.children(parent).unwrap().get(hidden).copied();
            if let Some(id) = lower {
                if self.nodes[id].layer < layer {
                    self.children_mut(parent).unwrap().remove(hidden);
                }
            }
            return Ok(());
        }
        let parent = self.parent_dir(comps, layer)?;
        let existing = self.children(parent).unwrap().get(*name).copied();
        if let (Some(id), Data::Dir(_)) = (existing, &node.data) {
            if matches!(self.nodes[id].data, Data::Dir(_)) {
                self.nodes[id].meta = node.meta;
                self.nodes[id].layer = layer;
                return Ok(());
            }
        }
        let id = self.push(node);
        self.children_mut(parent).unwrap().insert(name.to_vec(), id);
        Ok(())
    }

    /// The directory at `comps`, creating it (and its parents) if missing.
    fn lookup_or_create_dir(
        &mut self,
        comps: &[&[u8]],
        layer: usize,
    ) -> Result<NodeId, ApplyError> {
        let mut with_leaf = comps.to_vec();
        with_leaf.push(b"-");
        self.parent_dir(&with_leaf, layer)
    }

    /// Add a hard link at `comps` to the existing non-directory at `target`.
    pub fn link(
        &mut self,
        comps: &[&[u8]],
        target: &[&[u8]],
        layer: usize,
    ) -> Result<(), ApplyError> {
        let id = self
            .lookup(target)
            .ok_or_else(|| ApplyError::NoLinkTarget(show(target)))?;
        if self.children(id).is_some() {
            return Err(ApplyError::LinkToDir(show(target)));
        }
        let Some(name) = comps.last() else {
            return Err(ApplyError::Name(show(comps)));
        };
        if name.starts_with(WHITEOUT_PREFIX) {
            return Err(ApplyError::Name(show(comps)));
        }
        let parent = self.parent_dir(comps, layer)?;
        self.children_mut(parent).unwrap().insert(name.to_vec(), id);
        Ok(())
    }

    /// Node ids reachable from the root in depth-first pre-order, each once
    /// (hard-linked nodes at their first path), directory entries by name.
    pub fn reachable(&self) -> Vec<NodeId> {
        let mut seen = vec![false; self.nodes.len()];
        let mut order = Vec::new();
        let mut stack = vec![self.root];
        seen[self.root] = true;
        while let Some(id) = stack.pop() {
            order.push(id);
            if let Data::Dir(children) = &self.nodes[id].data {
                for &c in children.values().rev() {
                    if !seen[c] {
                        seen[c] = true;
                        stack.push(c);
                    }
                }
            }
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(layer: usize) -> Node {
        Node {
            meta: Meta {
                mode: S_IFREG | 0o644,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                xattrs: BTreeMap::new(),
            },
            data: Data::File {
                size: 0,
                chunks: vec![],
            },
            layer,
        }
    }

    fn dir(layer: usize) -> Node {
        Node {
            data: Data::Dir(BTreeMap::new()),
            meta: Meta {
                mode: S_IFDIR | 0o755,
                ..file(layer).meta
            },
            layer,
        }
    }

    fn p(s: &str) -> Vec<&[u8]> {
        split_path(s.as_bytes()).unwrap()
    }

    #[test]
    fn whiteouts_and_opaque() {
        let mut t = Tree::new();
        t.apply(&p("a"), dir(0)).unwrap();
        t.apply(&p("a/x"), file(0)).unwrap();
        t.apply(&p("a/y"), file(0)).unwrap();
        t.apply(&p("b/z"), file(0)).unwrap();
        // layer 1: new file in a, then opaque marker: only the new one stays
        t.apply(&p("a/n"), file(1)).unwrap();
        t.apply(&p("a/.wh..wh..opq"), file(1)).unwrap();
        t.apply(&p("b/.wh.z"), file(1)).unwrap();
        assert!(t.lookup(&p("a/x")).is_none());
        assert!(t.lookup(&p("a/n")).is_some());
        assert!(t.lookup(&p("b/z")).is_none());
        assert!(t.lookup(&p("b")).is_some());
    }

    #[test]
    fn hostile_paths() {
        assert!(split_path(b"../etc").is_err());
        assert!(split_path(b"/etc/passwd").is_err());
        assert!(split_path(b"a/../../b").is_err());
        assert_eq!(split_path(b"./a//b/").unwrap(), vec![&b"a"[..], b"b"]);
        let mut t = Tree::new();
        t.apply(&p("f"), file(0)).unwrap();
        assert!(matches!(
            t.apply(&p("f/g"), file(0)),
            Err(ApplyError::NotDir(_))
        ));
        assert!(matches!(
            t.link(&p("l"), &p("nope"), 0),
            Err(ApplyError::NoLinkTarget(_))
        ));
    }

    #[test]
    fn links_across_layers_survive_replacement() {
        let mut t = Tree::new();
        t.apply(&p("f"), file(0)).unwrap();
        t.link(&p("g"), &p("f"), 1).unwrap();
        assert_eq!(t.lookup(&p("f")), t.lookup(&p("g")));
        t.apply(&p("f"), file(2)).unwrap();
        assert_ne!(t.lookup(&p("f")), t.lookup(&p("g")));
    }
}
