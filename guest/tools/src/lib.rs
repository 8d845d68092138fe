//! Statically linked tools run inside guests: clock probe and sequence-numbered traffic.
