//! The experiment spec (TOML): nodes, LANs, links, workloads. (Being written.)
