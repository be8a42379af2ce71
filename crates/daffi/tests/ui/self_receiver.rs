struct Counter;

impl Counter {
    #[daffi::callback]
    fn get(&self) -> i64 {
        0
    }
}

fn main() {}
