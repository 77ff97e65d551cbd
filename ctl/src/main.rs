fn main() {
    eprintln!("mergend: the control API is not built yet (issue 4)");
    std::process::exit(1);
}
