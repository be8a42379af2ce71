//! What `#[callback]` refuses, with the message it gives (trybuild).

#[test]
fn callback_macro_refuses_what_cannot_cross_a_process_boundary() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
