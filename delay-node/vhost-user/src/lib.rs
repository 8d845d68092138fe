//! vhost-user-net backend ports for the delay node (being written).
