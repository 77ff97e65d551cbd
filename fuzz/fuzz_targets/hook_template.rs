#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mergen_fuzz::hook_template::check(data));
