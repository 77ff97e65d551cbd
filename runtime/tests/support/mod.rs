pub mod firecracker_double;
pub mod nginx;
