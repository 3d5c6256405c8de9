//! Compiles the wire protocol and the admin API with protox, so no `protoc` is
//! needed. The admin API's gRPC service code is generated only with the
//! `admin` feature (the agent does not link tonic).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let wire = "proto/grantline/v1/wire.proto";
    let admin = "proto/grantline/admin/v1/admin.proto";
    for p in [wire, admin] {
        println!("cargo:rerun-if-changed={p}");
    }
    prost_build::Config::new().compile_fds(protox::compile([wire], ["proto"])?)?;
    if std::env::var_os("CARGO_FEATURE_ADMIN").is_some() {
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            // Callers dial their own channel (a Unix socket), so the client
            // needs no tonic transport and the CLI links no gRPC server.
            .build_transport(false)
            .compile_fds(protox::compile([admin], ["proto"])?)?;
    }
    Ok(())
}
