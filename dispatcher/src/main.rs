//! The dispatcher: validates requests and publishes jobs (HTTP API and CLI).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the dispatcher is not built yet (issue P2)")
}
