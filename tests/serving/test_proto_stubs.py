"""The committed stubs are exactly what grpcio-tools generates from the proto (no drift)."""

from __future__ import annotations

from pijax.serving.proto import generate


def test_committed_stubs_match_the_proto():
    import grpc_tools  # noqa: F401 - the dev extra: what regenerates the stubs

    stale = generate.stale_stubs()
    assert not stale, (
        f"stubs out of date with inference.proto: {stale}; run "
        "python -m pijax.serving.proto.generate and commit the result"
    )


def test_stubs_import_under_the_package_path():
    from pijax.serving.proto.pijax.v1 import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "pijax.v1"
    assert inference_pb2.DESCRIPTOR.name == "pijax/v1/inference.proto"
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert [m.name for m in service.methods] == [
        "Generate",
        "Tokenize",
        "ModelInfo",
        "EndSession",
        "RegisterTrustedPrefix",
        "ReadAuditLog",
    ]
    assert service.methods_by_name["Generate"].server_streaming
    assert hasattr(inference_pb2_grpc, "InferenceStub")
