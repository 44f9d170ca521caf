//! Generates the catalog API (`proto/meshgate/catalog/v1/catalog.proto`):
//! prost messages, the tonic server and client. The proto is compiled by
//! protox, so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(["meshgate/catalog/v1/catalog.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // The HTTP JSON API serves the very messages of the gRPC API.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_fds(files)?;
    Ok(())
}
