# Generated from worker.proto by purerpc's protoc plugin via tools/gen_proto.py.
# DO NOT EDIT: regenerate with `nox -s proto`.
import purerpc
from . import worker_pb2 as worker__pb2
import google.protobuf.duration_pb2 as google_dot_protobuf_dot_duration__pb2
import google.protobuf.timestamp_pb2 as google_dot_protobuf_dot_timestamp__pb2


class WorkerServicer(purerpc.Servicer):
    async def Start(self, input_message):
        raise NotImplementedError()

    async def Stop(self, input_message):
        raise NotImplementedError()

    async def Signal(self, input_message):
        raise NotImplementedError()

    async def Status(self, input_message):
        raise NotImplementedError()

    async def Wait(self, input_message):
        raise NotImplementedError()

    async def List(self, input_message):
        raise NotImplementedError()

    async def Output(self, input_message):
        raise NotImplementedError()

    async def Attach(self, input_messages):
        raise NotImplementedError()

    async def Remove(self, input_message):
        raise NotImplementedError()

    @property
    def service(self) -> purerpc.Service:
        service_obj = purerpc.Service(
            "trioworker.v1.Worker"
        )
        service_obj.add_method(
            "Start",
            self.Start,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.StartRequest,
                worker__pb2.Job,
            )
        )
        service_obj.add_method(
            "Stop",
            self.Stop,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.StopRequest,
                worker__pb2.Job,
            )
        )
        service_obj.add_method(
            "Signal",
            self.Signal,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.SignalRequest,
                worker__pb2.Job,
            )
        )
        service_obj.add_method(
            "Status",
            self.Status,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.StatusRequest,
                worker__pb2.Job,
            )
        )
        service_obj.add_method(
            "Wait",
            self.Wait,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.WaitRequest,
                worker__pb2.Job,
            )
        )
        service_obj.add_method(
            "List",
            self.List,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.ListRequest,
                worker__pb2.ListResponse,
            )
        )
        service_obj.add_method(
            "Output",
            self.Output,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                worker__pb2.OutputRequest,
                worker__pb2.OutputChunk,
            )
        )
        service_obj.add_method(
            "Attach",
            self.Attach,
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_STREAM,
                worker__pb2.AttachRequest,
                worker__pb2.AttachResponse,
            )
        )
        service_obj.add_method(
            "Remove",
            self.Remove,
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.RemoveRequest,
                worker__pb2.Job,
            )
        )
        return service_obj


class WorkerStub:
    def __init__(self, channel):
        self._client = purerpc.Client(
            "trioworker.v1.Worker",
            channel
        )
        self.Start = self._client.get_method_stub(
            "Start",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.StartRequest,
                worker__pb2.Job,
            )
        )
        self.Stop = self._client.get_method_stub(
            "Stop",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.StopRequest,
                worker__pb2.Job,
            )
        )
        self.Signal = self._client.get_method_stub(
            "Signal",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.SignalRequest,
                worker__pb2.Job,
            )
        )
        self.Status = self._client.get_method_stub(
            "Status",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.StatusRequest,
                worker__pb2.Job,
            )
        )
        self.Wait = self._client.get_method_stub(
            "Wait",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.WaitRequest,
                worker__pb2.Job,
            )
        )
        self.List = self._client.get_method_stub(
            "List",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.ListRequest,
                worker__pb2.ListResponse,
            )
        )
        self.Output = self._client.get_method_stub(
            "Output",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_STREAM,
                worker__pb2.OutputRequest,
                worker__pb2.OutputChunk,
            )
        )
        self.Attach = self._client.get_method_stub(
            "Attach",
            purerpc.RPCSignature(
                purerpc.Cardinality.STREAM_STREAM,
                worker__pb2.AttachRequest,
                worker__pb2.AttachResponse,
            )
        )
        self.Remove = self._client.get_method_stub(
            "Remove",
            purerpc.RPCSignature(
                purerpc.Cardinality.UNARY_UNARY,
                worker__pb2.RemoveRequest,
                worker__pb2.Job,
            )
        )
