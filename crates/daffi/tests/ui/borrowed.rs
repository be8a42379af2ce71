#[daffi::callback]
fn greet(name: &str) -> String {
    format!("hello {name}")
}

fn main() {}
