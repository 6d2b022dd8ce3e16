//! The pod's network: CNI config discovery, plugin chains and their result cache (`cni`), and
//! the named network namespaces pods get (`netns`). Knows nothing of pods beyond their ids.

pub mod cni;
pub mod netns;
