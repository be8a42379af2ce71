struct Counter {
    n: i64,
}

#[daffi::callback]
impl Counter {
    pub fn bump(&mut self) -> i64 {
        self.n += 1;
        self.n
    }
}

fn main() {}
