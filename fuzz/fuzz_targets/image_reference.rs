#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| crisp_fuzz_targets::image_reference(data));
