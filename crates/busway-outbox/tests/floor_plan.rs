//! busway-outbox has a floor plan without circles: no module imports a module that imports it
//! back (the checker is busway-core's).

#[path = "../../busway-core/tests/support/floor_plan.rs"]
mod floor_plan;

#[test]
fn no_module_imports_one_that_imports_it_back() {
    floor_plan::assert_no_cycles("busway-outbox", env!("CARGO_MANIFEST_DIR"), 5);
}
