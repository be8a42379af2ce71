struct Wrapper<T>(T);

#[daffi::callback]
impl<T: Send + Sync + 'static> Wrapper<T> {
    pub fn size() -> usize {
        std::mem::size_of::<T>()
    }
}

fn main() {}
