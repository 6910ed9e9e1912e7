"""protos/inference/*.proto is wire-compatible with Triton's grpc_service.proto and
model_config.proto, as tritonclient ships them: every message, field, enum value and method the
server declares exists there with the same number, type and cardinality. Both sets of stubs live
in one process (this test imports both), and each parses the other's bytes."""

import tritonclient.grpc.model_config_pb2 as triton_config
import tritonclient.grpc.service_pb2 as triton
from google.protobuf.descriptor import Descriptor, EnumDescriptor

from serving.proto import OIP_SERVICE_NAME, oip, oip_config, pb, reflection_pool


def _messages(descriptor: Descriptor):
    yield descriptor
    for nested in descriptor.nested_types:
        yield from _messages(nested)


def _ours():
    for file in (oip.DESCRIPTOR, oip_config.DESCRIPTOR):
        for message in file.message_types_by_name.values():
            yield from _messages(message)


def _type_name(field) -> str:
    if field.message_type is not None:
        return field.message_type.full_name
    return field.enum_type.full_name if field.enum_type is not None else ""


def test_every_message_and_field_matches_triton():
    theirs = triton.DESCRIPTOR.pool
    checked = 0
    for message in _ours():
        reference = theirs.FindMessageTypeByName(message.full_name)
        for field in message.fields:
            other = reference.fields_by_name.get(field.name)
            assert other is not None, f"{message.full_name}.{field.name}: not in Triton's proto"
            assert (field.number, field.type, field.is_repeated, _type_name(field)) == (
                other.number,
                other.type,
                other.is_repeated,
                _type_name(other),
            ), f"{message.full_name}.{field.name}"
            checked += 1
    assert checked > 60


def test_enums_and_methods_match_triton():
    for enum in oip_config.DESCRIPTOR.enum_types_by_name.values():
        reference: EnumDescriptor = triton_config.DESCRIPTOR.enum_types_by_name[enum.name]
        assert [(v.name, v.number) for v in enum.values] == [(v.name, v.number) for v in reference.values]
    ours = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    reference = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == reference.full_name == OIP_SERVICE_NAME == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = reference.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            other.input_type.full_name,
            other.output_type.full_name,
        )
        assert (method.client_streaming, method.server_streaming) == (other.client_streaming, other.server_streaming)
    assert {m.name for m in ours.methods} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelConfig",
    }  # fmt: skip


def test_both_stubs_coexist_and_read_each_others_bytes():
    ours = oip.ModelInferRequest(model_name="forecaster", id="r1", raw_input_contents=[b"\x00\x00\x80\x3f"])
    ours.parameters["sequence_id"].string_param = "meter-7"
    ours.parameters["sequence_start"].bool_param = True
    parsed = triton.ModelInferRequest.FromString(ours.SerializeToString())
    assert parsed.parameters["sequence_id"].string_param == "meter-7"
    assert parsed.raw_input_contents == [b"\x00\x00\x80?"]
    config = triton.ModelConfigResponse()
    config.config.sequence_batching.max_sequence_idle_microseconds = 5
    back = oip.ModelConfigResponse.FromString(config.SerializeToString())
    assert back.config.WhichOneof("scheduling_choice") == "sequence_batching"
    assert oip.DESCRIPTOR.pool is not triton.DESCRIPTOR.pool  # our own pool: no duplicate symbols


def test_the_reflection_pool_holds_every_service_under_its_canonical_file_name():
    pool = reflection_pool(pb.DESCRIPTOR, oip.DESCRIPTOR)
    assert pool.FindFileContainingSymbol(OIP_SERVICE_NAME).name == "inference/grpc_service.proto"
    assert pool.FindFileContainingSymbol("inference.ModelConfig").name == "inference/model_config.proto"
    assert pool.FindFileContainingSymbol("forecast.v1.Forecaster").name == "forecast/v1/forecast.proto"
