// A minimal SDS server standing in for istio-agent's, for the e2e suite's
// waypoint (integration/e2e/shared_proxy.py): istiod gives a waypoint's
// listeners and clusters TLS contexts whose secrets come from istio-agent's
// SDS (cluster `sds-grpc`, initial_fetch_timeout 0s), so without an answer
// Envoy never finishes initializing. This answers every StreamSecrets request
// with the certificate it was given (for any name but ROOTCA) or that
// certificate as a trust bundle (ROOTCA, file-root:*). No traffic is sent
// through those contexts; the certificate only lets Envoy warm. Protobuf is
// hand-encoded (protowire) to keep the build small; the module versions are
// the ones istiod's go.sum pins, so the build needs no download after istiod's.
// Usage: sds LISTEN_ADDR CERT_PEM KEY_PEM
package main

import (
	"fmt"
	"log"
	"net"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/protobuf/encoding/protowire"
)

type raw struct{}

func (raw) Marshal(v any) ([]byte, error)   { return *(v.(*[]byte)), nil }
func (raw) Unmarshal(b []byte, v any) error { *(v.(*[]byte)) = append([]byte(nil), b...); return nil }
func (raw) Name() string                    { return "proto" }

var cert, key []byte

func dataSource(b []byte) []byte { // DataSource{inline_bytes=2}
	return protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), b)
}

func msg(field protowire.Number, body []byte, out []byte) []byte {
	return protowire.AppendBytes(protowire.AppendTag(out, field, protowire.BytesType), body)
}

func secret(name string) []byte {
	s := msg(1, []byte(name), nil)
	if name == "ROOTCA" || strings.HasPrefix(name, "file-root") {
		s = msg(4, msg(1, dataSource(cert), nil), s) // validation_context.trusted_ca
	} else {
		tls := msg(1, dataSource(cert), nil) // certificate_chain
		tls = msg(2, dataSource(key), tls)   // private_key
		s = msg(2, tls, s)                   // tls_certificate
	}
	return s
}

const secretType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

func handler(_ any, stream grpc.ServerStream) error {
	nonce := 0
	for {
		var req []byte
		if err := stream.RecvMsg(&req); err != nil {
			return err
		}
		var names []string
		var ackNonce string
		b := req
		for len(b) > 0 {
			num, typ, n := protowire.ConsumeTag(b)
			b = b[n:]
			if typ == protowire.BytesType {
				v, m := protowire.ConsumeBytes(b)
				if num == 3 {
					names = append(names, string(v))
				}
				if num == 5 {
					ackNonce = string(v)
				}
				b = b[m:]
			} else {
				m := protowire.ConsumeFieldValue(num, typ, b)
				b = b[m:]
			}
		}
		if ackNonce != "" {
			continue // an ACK/NACK of what we sent
		}
		nonce++
		resp := msg(1, []byte("1"), nil)
		for _, n := range names {
			anyb := msg(1, []byte(secretType), nil)
			anyb = msg(2, secret(n), anyb)
			resp = msg(2, anyb, resp)
		}
		resp = msg(4, []byte(secretType), resp)
		resp = msg(5, []byte(fmt.Sprint(nonce)), resp)
		log.Printf("serving %v", names)
		if err := stream.SendMsg(&resp); err != nil {
			return err
		}
	}
}

func main() {
	encoding.RegisterCodec(raw{})
	var err error
	if cert, err = os.ReadFile(os.Args[2]); err != nil {
		log.Fatal(err)
	}
	if key, err = os.ReadFile(os.Args[3]); err != nil {
		log.Fatal(err)
	}
	lis, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		log.Fatal(err)
	}
	s := grpc.NewServer(grpc.ForceServerCodec(raw{}))
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: "envoy.service.secret.v3.SecretDiscoveryService",
		HandlerType: (*any)(nil),
		Streams:     []grpc.StreamDesc{{StreamName: "StreamSecrets", Handler: handler, ServerStreams: true, ClientStreams: true}},
	}, struct{}{})
	log.Printf("sds on %s", os.Args[1])
	log.Fatal(s.Serve(lis))
}
