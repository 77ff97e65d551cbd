#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergen_fuzz::pg_preamble::check(data));
