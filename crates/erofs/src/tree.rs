//! The in-memory tree a build assembles from its sources, with OCI layer
//! semantics (whiteouts, opaque directories, hard links across layers).
//! Regular-file data is already in blobs by the time it reaches the tree;
//! the tree holds only metadata and chunk references.

use std::collections::{BTreeMap, HashMap, HashSet};

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
        /// sha256 of the whole content, computed while the chunks are
        /// stored; `None` for empty files and files with too much hole to
        /// hash. The writer turns it into the kernel's inode fingerprint.
        fingerprint: Option<[u8; 32]>,
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
    /// The layer being applied; merged into `root` when it ends.
    stage: Option<Stage>,
}

/// One layer's entries, kept apart from the layers below until the layer
/// ends. Whiteouts and opaque markers then hide exactly what the layers
/// below hold, wherever they appear in the layer (OCI image spec; what
/// overlayfs shows for containerd's snapshots), and never what the layer
/// itself holds.
struct Stage {
    root: NodeId,
    /// Names each staged directory whites out in the layers below.
    whiteouts: HashMap<NodeId, Vec<Vec<u8>>>,
    /// Staged directories whose lower contents are hidden.
    opaque: HashSet<NodeId>,
    /// Staged directories an entry declared: their metadata replaces the
    /// lower directory's. The others were only implied by deeper paths.
    declared: HashSet<NodeId>,
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

fn dir_node() -> Node {
    Node {
        meta: Meta {
            mode: S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: BTreeMap::new(),
        },
        data: Data::Dir(BTreeMap::new()),
    }
}

impl Tree {
    pub fn new() -> Self {
        Tree {
            nodes: vec![dir_node()],
            root: 0,
            stage: None,
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

    fn is_dir(&self, id: NodeId) -> bool {
        self.children(id).is_some()
    }

    fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Resolve a path in the merged layers (not the one being applied),
    /// without following symlinks.
    pub fn lookup(&self, comps: &[&[u8]]) -> Option<NodeId> {
        let mut cur = self.root;
        for c in comps {
            cur = *self.children(cur)?.get(*c)?;
        }
        Some(cur)
    }

    /// Resolve an absolute path in the merged layers as the kernel would
    /// inside the image: symlinks followed (40 at most), `..` stopping at
    /// the root. A recorded access order names files by the paths a
    /// program opened (`/lib/...` through a usrmerge symlink, say).
    pub fn resolve(&self, path: &[u8]) -> Option<NodeId> {
        let mut stack = vec![self.root];
        let mut todo: Vec<&[u8]> = path.split(|&b| b == b'/').rev().collect();
        let mut hops = 0;
        while let Some(c) = todo.pop() {
            match c {
                b"" | b"." => continue,
                b".." => {
                    if stack.len() > 1 {
                        stack.pop();
                    }
                    continue;
                }
                _ => {}
            }
            let id = *self.children(*stack.last()?)?.get(c)?;
            match &self.nodes[id].data {
                Data::Symlink(target) => {
                    hops += 1;
                    if hops > 40 {
                        return None;
                    }
                    if target.starts_with(b"/") {
                        stack.truncate(1);
                    }
                    todo.extend(target.split(|&b| b == b'/').rev());
                }
                _ => stack.push(id),
            }
        }
        stack.last().copied()
    }

    /// Start applying a layer. Entries go to a stage of their own until
    /// [`Tree::end_layer`]; an unfinished layer is ended first.
    pub fn begin_layer(&mut self) {
        self.end_layer();
        let root = self.push(dir_node());
        self.stage = Some(Stage {
            root,
            whiteouts: HashMap::new(),
            opaque: HashSet::new(),
            declared: HashSet::new(),
        });
    }

    fn stage(&mut self) -> &mut Stage {
        if self.stage.is_none() {
            self.begin_layer();
        }
        self.stage.as_mut().unwrap()
    }

    /// Walk the stage to the parent directory of `comps`, creating the
    /// directories a layer implies but does not declare.
    fn stage_parent(&mut self, comps: &[&[u8]]) -> Result<NodeId, ApplyError> {
        let mut cur = self.stage().root;
        for (i, c) in comps[..comps.len() - 1].iter().enumerate() {
            let children = self
                .children(cur)
                .ok_or_else(|| ApplyError::NotDir(show(&comps[..i])))?;
            cur = match children.get(*c).copied() {
                Some(id) => id,
                None => {
                    let id = self.push(dir_node());
                    self.children_mut(cur).unwrap().insert(c.to_vec(), id);
                    id
                }
            };
        }
        if !self.is_dir(cur) {
            return Err(ApplyError::NotDir(show(&comps[..comps.len() - 1])));
        }
        Ok(cur)
    }

    /// Apply one layer entry. Whiteouts (`.wh.NAME`) and opaque markers
    /// (`.wh..wh..opq`) are recorded for the end of the layer; a directory
    /// over a directory keeps its children; anything else replaces.
    pub fn apply(&mut self, comps: &[&[u8]], node: Node) -> Result<(), ApplyError> {
        let is_dir = matches!(node.data, Data::Dir(_));
        let Some(name) = comps.last() else {
            // The root itself: take its metadata, keep its children.
            if !is_dir || node.meta.mode & S_IFMT != S_IFDIR {
                return Err(ApplyError::RootNotDir);
            }
            let root = self.stage().root;
            self.nodes[root].meta = node.meta;
            self.stage().declared.insert(root);
            return Ok(());
        };
        if *name == OPAQUE_MARKER {
            let mut dir_path = comps[..comps.len() - 1].to_vec();
            dir_path.push(b"-");
            let dir = self.stage_parent(&dir_path)?;
            self.stage().opaque.insert(dir);
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(ApplyError::Name(show(comps)));
            }
            let parent = self.stage_parent(comps)?;
            let list = self.stage().whiteouts.entry(parent).or_default();
            list.push(hidden.to_vec());
            return Ok(());
        }
        let parent = self.stage_parent(comps)?;
        let existing = self.children(parent).unwrap().get(*name).copied();
        let id = match existing {
            Some(id) if is_dir && self.is_dir(id) => {
                self.nodes[id].meta = node.meta;
                id
            }
            _ => {
                let id = self.push(node);
                self.children_mut(parent).unwrap().insert(name.to_vec(), id);
                id
            }
        };
        if is_dir {
            self.stage().declared.insert(id);
        }
        Ok(())
    }

    /// Resolve a path in the merged view of the layers below and the
    /// stage over them (as a hard link target is resolved while a layer
    /// is unpacked), without following symlinks.
    fn lookup_merged(&self, comps: &[&[u8]]) -> Option<NodeId> {
        let stage = self.stage.as_ref()?;
        let (mut staged, mut lower) = (Some(stage.root), Some(self.root));
        for c in comps {
            let hides = staged.is_some_and(|s| {
                stage.opaque.contains(&s)
                    || stage
                        .whiteouts
                        .get(&s)
                        .is_some_and(|w| w.iter().any(|n| n == c))
            });
            let s_child = staged.and_then(|s| self.children(s)?.get(*c).copied());
            let l_child = lower
                .filter(|_| !hides)
                .and_then(|l| self.children(l)?.get(*c).copied());
            (staged, lower) = match s_child {
                Some(s) if self.is_dir(s) => (Some(s), l_child.filter(|&l| self.is_dir(l))),
                Some(s) => (Some(s), None),
                None => (None, l_child),
            };
        }
        staged.or(lower)
    }

    /// Add a hard link at `comps` to the existing non-directory at `target`.
    pub fn link(&mut self, comps: &[&[u8]], target: &[&[u8]]) -> Result<(), ApplyError> {
        self.stage();
        let id = self
            .lookup_merged(target)
            .ok_or_else(|| ApplyError::NoLinkTarget(show(target)))?;
        if self.is_dir(id) {
            return Err(ApplyError::LinkToDir(show(target)));
        }
        let Some(name) = comps.last() else {
            return Err(ApplyError::Name(show(comps)));
        };
        if name.starts_with(WHITEOUT_PREFIX) {
            return Err(ApplyError::Name(show(comps)));
        }
        let parent = self.stage_parent(comps)?;
        self.children_mut(parent).unwrap().insert(name.to_vec(), id);
        Ok(())
    }

    /// Merge the stage into the tree: in each directory, an opaque marker
    /// empties the lower directory, whiteouts remove lower names, then the
    /// layer's entries go in (a directory over a directory merges, taking
    /// the declared metadata). Iterative: paths may nest thousands deep.
    pub fn end_layer(&mut self) {
        let Some(stage) = self.stage.take() else {
            return;
        };
        let mut work = vec![(self.root, stage.root)];
        while let Some((lower, staged)) = work.pop() {
            if stage.declared.contains(&staged) {
                self.nodes[lower].meta = self.nodes[staged].meta.clone();
            }
            let below = self.children_mut(lower).unwrap();
            if stage.opaque.contains(&staged) {
                below.clear();
            }
            for name in stage.whiteouts.get(&staged).into_iter().flatten() {
                below.remove(name);
            }
            let entries = std::mem::take(self.children_mut(staged).unwrap());
            for (name, s) in entries {
                let l = self.children(lower).unwrap().get(&name).copied();
                match l {
                    Some(l) if self.is_dir(l) && self.is_dir(s) => work.push((l, s)),
                    _ => {
                        self.children_mut(lower).unwrap().insert(name, s);
                    }
                }
            }
        }
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

    fn file() -> Node {
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
                fingerprint: None,
            },
        }
    }

    fn dir(mtime: i64) -> Node {
        Node {
            data: Data::Dir(BTreeMap::new()),
            meta: Meta {
                mode: S_IFDIR | 0o755,
                mtime,
                ..file().meta
            },
        }
    }

    fn p(s: &str) -> Vec<&[u8]> {
        split_path(s.as_bytes()).unwrap()
    }

    fn layer(t: &mut Tree, entries: &[&str]) {
        t.begin_layer();
        for e in entries {
            let node = if e.ends_with('/') { dir(1) } else { file() };
            t.apply(&p(e), node).unwrap();
        }
        t.end_layer();
    }

    #[test]
    fn whiteouts_and_opaque() {
        let mut t = Tree::new();
        layer(&mut t, &["a/", "a/x", "a/y", "b/z"]);
        // A new file in a, then the opaque marker: only the new one stays.
        layer(&mut t, &["a/n", "a/.wh..wh..opq", "b/.wh.z"]);
        assert!(t.lookup(&p("a/x")).is_none());
        assert!(t.lookup(&p("a/n")).is_some());
        assert!(t.lookup(&p("b/z")).is_none());
        assert!(t.lookup(&p("b")).is_some());
    }

    /// Whiteouts hide the layers below wherever they appear in the layer,
    /// and never the layer's own entries.
    #[test]
    fn whiteouts_do_not_depend_on_entry_order() {
        let lower = ["a/", "a/b/", "a/b/old", "c/", "c/old"];
        let orders: [&[&str]; 4] = [
            &["a/", "a/b/", "a/b/new", "a/.wh..wh..opq"],
            &["a/.wh..wh..opq", "a/", "a/b/", "a/b/new"],
            &["a/b/new", "a/.wh..wh..opq"],
            &["a/.wh..wh..opq", "a/b/new"],
        ];
        for upper in orders {
            let mut t = Tree::new();
            layer(&mut t, &lower);
            layer(&mut t, upper);
            assert!(t.lookup(&p("a/b/old")).is_none(), "{upper:?}");
            assert!(t.lookup(&p("a/b/new")).is_some(), "{upper:?}");
            assert!(t.lookup(&p("c/old")).is_some(), "{upper:?}");
        }
        for upper in [
            &["c/new", "c/.wh.old", "c/.wh.new"][..],
            &["c/.wh.new", "c/new"],
        ] {
            let mut t = Tree::new();
            layer(&mut t, &lower);
            layer(&mut t, upper);
            assert!(t.lookup(&p("c/new")).is_some(), "{upper:?}");
        }
        // Opaque at the root; a whiteout of a missing path is harmless.
        let mut t = Tree::new();
        layer(&mut t, &lower);
        layer(&mut t, &[".wh..wh..opq", "n", "x/.wh.missing"]);
        assert!(t.lookup(&p("a")).is_none());
        assert!(t.lookup(&p("n")).is_some());
        assert!(t.lookup(&p("x")).is_some());
    }

    #[test]
    fn implied_directories_keep_lower_metadata() {
        let mut t = Tree::new();
        t.begin_layer();
        t.apply(&p("a"), dir(7)).unwrap();
        t.end_layer();
        layer(&mut t, &["a/f"]);
        assert_eq!(t.nodes[t.lookup(&p("a")).unwrap()].meta.mtime, 7);
        layer(&mut t, &["a/"]);
        assert_eq!(t.nodes[t.lookup(&p("a")).unwrap()].meta.mtime, 1);
        assert!(t.lookup(&p("a/f")).is_some());
    }

    #[test]
    fn hostile_paths() {
        assert!(split_path(b"../etc").is_err());
        assert!(split_path(b"/etc/passwd").is_err());
        assert!(split_path(b"a/../../b").is_err());
        assert_eq!(split_path(b"./a//b/").unwrap(), vec![&b"a"[..], b"b"]);
        let mut t = Tree::new();
        t.apply(&p("f"), file()).unwrap();
        assert!(matches!(
            t.apply(&p("f/g"), file()),
            Err(ApplyError::NotDir(_))
        ));
        assert!(matches!(
            t.link(&p("l"), &p("nope")),
            Err(ApplyError::NoLinkTarget(_))
        ));
    }

    #[test]
    fn links_across_layers() {
        let mut t = Tree::new();
        layer(&mut t, &["f", "d/", "d/x"]);
        t.begin_layer();
        t.link(&p("g"), &p("f")).unwrap();
        t.link(&p("y"), &p("d/x")).unwrap();
        t.end_layer();
        assert_eq!(t.lookup(&p("f")), t.lookup(&p("g")));
        layer(&mut t, &["f"]);
        assert_ne!(t.lookup(&p("f")), t.lookup(&p("g")));
        // A target the layer itself whited out is gone.
        t.begin_layer();
        t.apply(&p("d/.wh.x"), file()).unwrap();
        assert!(matches!(
            t.link(&p("z"), &p("d/x")),
            Err(ApplyError::NoLinkTarget(_))
        ));
        t.end_layer();
        assert!(
            t.lookup(&p("y")).is_some(),
            "the earlier link keeps the file"
        );
    }

    /// Paths resolve through symlinks (relative, absolute, `..`) and not
    /// through loops.
    #[test]
    fn resolve_follows_symlinks() {
        let link = |target: &str| Node {
            meta: Meta {
                mode: S_IFLNK | 0o777,
                ..file().meta
            },
            data: Data::Symlink(target.as_bytes().to_vec()),
        };
        let mut t = Tree::new();
        t.begin_layer();
        for e in ["usr/", "usr/lib/", "usr/lib/libc.so"] {
            let node = if e.ends_with('/') { dir(1) } else { file() };
            t.apply(&p(e), node).unwrap();
        }
        t.apply(&p("lib"), link("usr/lib")).unwrap();
        t.apply(&p("usr/lib/abs"), link("/usr/lib/libc.so"))
            .unwrap();
        t.apply(&p("usr/up"), link("../lib/../lib")).unwrap();
        t.apply(&p("loop"), link("loop")).unwrap();
        t.end_layer();
        let libc = t.lookup(&p("usr/lib/libc.so"));
        assert!(libc.is_some());
        for path in [
            "/usr/lib/libc.so",
            "/lib/libc.so",
            "/lib/abs",
            "/usr/up/libc.so",
            "/../lib/./libc.so",
        ] {
            assert_eq!(t.resolve(path.as_bytes()), libc, "{path}");
        }
        assert_eq!(t.resolve(b"/loop/x"), None);
        assert_eq!(t.resolve(b"/lib/missing"), None);
    }
}
