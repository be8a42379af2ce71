#[daffi::callback]
fn pick<T: serde::de::DeserializeOwned>(value: T) -> i64 {
    let _ = value;
    0
}

fn main() {}
