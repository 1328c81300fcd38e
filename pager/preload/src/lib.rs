//! LD_PRELOAD attach library (filled by the QEMU issue).
