// Command interop_go makes one gRPC call to trio-worker with grpc-go, the official Go client.
//
// It knows no message types: tests/test_interop_go.py encodes the request with trio_worker._pb
// and decodes the replies, so the wire bytes are exactly what generated Go code would send.
//
// Usage: interop_go ADDR CA CERT KEY METHOD unary|stream  (the request, hex, on stdin)
// Prints one JSON object: {"responses": [hex...], "code": N, "message": "...", "status": hex},
// where status is the google.rpc.Status grpc-go decoded from grpc-status-details-bin.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/ioutil"
	"os"
	"strings"
	"time"

	"github.com/golang/protobuf/proto"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// rawCodec passes serialized messages through: the test did the protobuf encoding.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
	}
	*b = append([]byte(nil), data...)
	return nil
}

// Name is "proto": the bytes on the wire are protobuf.
func (rawCodec) Name() string { return "proto" }

type result struct {
	Responses []string `json:"responses"`
	Code      uint32   `json:"code"`
	Message   string   `json:"message"`
	Status    string   `json:"status"`
	Cipher    string   `json:"cipher"`
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "interop_go: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	if len(os.Args) != 7 {
		fail("usage: interop_go ADDR CA CERT KEY METHOD unary|stream")
	}
	addr, caFile, certFile, keyFile, method, kind := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6]
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		fail("client certificate: %v", err)
	}
	caPEM, err := ioutil.ReadFile(caFile)
	if err != nil {
		fail("CA: %v", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		fail("CA: no certificate in %s", caFile)
	}
	input, err := ioutil.ReadAll(os.Stdin)
	if err != nil {
		fail("stdin: %v", err)
	}
	request, err := hex.DecodeString(strings.TrimSpace(string(input)))
	if err != nil {
		fail("stdin: %v", err)
	}

	var cipher string
	config := &tls.Config{
		Certificates: []tls.Certificate{pair},
		RootCAs:      roots,
		ServerName:   "localhost",
		MinVersion:   tls.VersionTLS13,
		VerifyConnection: func(cs tls.ConnectionState) error {
			cipher = tls.CipherSuiteName(cs.CipherSuite) + " " + cs.NegotiatedProtocol
			return nil
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, addr, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	if err != nil {
		fail("dial: %v", err)
	}
	defer conn.Close()

	out := result{Responses: []string{}}
	codec := grpc.ForceCodec(rawCodec{})
	switch kind {
	case "unary":
		var reply []byte
		err = conn.Invoke(ctx, method, &request, &reply, codec)
		if err == nil {
			out.Responses = append(out.Responses, hex.EncodeToString(reply))
		}
	case "stream":
		desc := &grpc.StreamDesc{ServerStreams: true}
		var stream grpc.ClientStream
		stream, err = conn.NewStream(ctx, desc, method, codec)
		if err == nil {
			err = stream.SendMsg(&request)
		}
		if err == nil {
			err = stream.CloseSend()
		}
		for err == nil {
			var reply []byte
			if err = stream.RecvMsg(&reply); err == nil {
				out.Responses = append(out.Responses, hex.EncodeToString(reply))
			}
		}
		if err == io.EOF {
			err = nil
		}
	default:
		fail("unknown kind %q", kind)
	}
	if err != nil {
		st, _ := status.FromError(err)
		out.Code = uint32(st.Code())
		out.Message = st.Message()
		encoded, merr := proto.Marshal(st.Proto())
		if merr != nil {
			fail("status: %v", merr)
		}
		out.Status = hex.EncodeToString(encoded)
	}
	out.Cipher = cipher
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("stdout: %v", err)
	}
}
