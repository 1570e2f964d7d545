//go:build tools

// Package tools pins the real gRPC peers the agent's tests run against:
// grpc-go's interop server and client, grpc-go's route_guide and
// helloworld example servers, and the ghz load generator. None of it is
// tidepool code.
package tools

import (
	_ "github.com/bojand/ghz/cmd/ghz"
	_ "google.golang.org/grpc/examples/helloworld/greeter_server"
	_ "google.golang.org/grpc/examples/route_guide/server"
	_ "google.golang.org/grpc/interop/client"
	_ "google.golang.org/grpc/interop/server"
)
