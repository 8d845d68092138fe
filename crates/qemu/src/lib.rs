//! QEMU control: launching VMs, the QMP client, stop/cont, save and restore of VM state.
