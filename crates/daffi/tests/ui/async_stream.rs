use daffi::callback;

#[callback]
async fn numbers(n: u64) -> impl Iterator<Item = u64> {
    1..=n
}

fn main() {}
