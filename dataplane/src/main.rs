fn main() {
    eprintln!("mergen-forwarder: the dataplane is not built yet (issue 6)");
    std::process::exit(1);
}
