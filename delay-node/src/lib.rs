//! Userspace link emulator in virtual time whose in-flight frames are checkpointed.
