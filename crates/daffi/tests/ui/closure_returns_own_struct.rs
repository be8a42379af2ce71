use daffi::Global;

#[derive(serde::Serialize)]
struct Person {
    name: String,
}

fn serve(g: &Global) -> daffi::Result<()> {
    g.register("who", || Person { name: "Ann".into() })
}

fn main() {}
