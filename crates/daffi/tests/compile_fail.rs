//! What `#[callback]` and `Global::register` refuse, with the message they give
//! (trybuild).

#[test]
fn callbacks_that_cannot_cross_a_process_boundary_are_refused_with_advice() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
