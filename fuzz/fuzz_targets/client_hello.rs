#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergen_fuzz::client_hello::check(data));
