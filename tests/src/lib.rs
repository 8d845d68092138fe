//! Whole-system tests that boot real QEMU guests.
