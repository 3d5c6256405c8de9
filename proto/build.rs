//! Compiles the wire protocol and the admin API with protox, so no `protoc` is
//! needed. The admin API's gRPC service code is generated only with the
//! `admin` feature, the SPIFFE Workload API's server with `workload`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let wire = "proto/grantline/v1/wire.proto";
    let admin = "proto/grantline/admin/v1/admin.proto";
    let workload = "proto/spiffe/workload.proto";
    for p in [wire, admin, workload] {
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
    if std::env::var_os("CARGO_FEATURE_WORKLOAD").is_some() {
        // The SPIFFE Workload API's server side, for the agent (RFD 0011).
        // Its file declares no package, so the code lands in `_.rs`.
        tonic_prost_build::configure()
            .build_client(false)
            .build_server(true)
            .build_transport(false)
            .compile_fds(protox::compile([workload], ["proto"])?)?;
    }
    Ok(())
}
