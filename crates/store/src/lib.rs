//! The checkpoint store: catalogue, manifests, atomic commits.
