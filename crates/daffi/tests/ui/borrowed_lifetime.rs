#[daffi::callback]
fn greet(name: std::borrow::Cow<'static, str>) -> String {
    format!("hello {name}")
}

fn main() {}
