pub mod firecracker_double;
