//! One host's half of a checkpoint: the VMs and delay node it runs, frozen and resumed on schedule.
