fn main() -> anyhow::Result<()> {
    println!("arbor {}", env!("CARGO_PKG_VERSION"));
    Ok(())
}
