fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/switchyard/v1/common.proto",
        "proto/switchyard/v1/coordinator.proto",
        "proto/switchyard/v1/expert_worker.proto",
        "proto/switchyard/v1/wire_bench.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        // Tensor payloads decode as `bytes::Bytes`: a zero-copy slice of the received buffer.
        .bytes(".switchyard.v1.WireTensor.data")
        .bytes(".switchyard.v1.EchoMessage.payload")
        .bytes(".switchyard.v1.TokenRows")
        .codec_path("crate::codec::SizedCodec")
        // Clients are made over a channel the caller built (`XClient::new`), never `connect`ed here.
        .build_transport(false)
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
