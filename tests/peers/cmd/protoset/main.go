// Command protoset writes a FileDescriptorSet of the services the agent's
// real-peer tests call (grpc-go's interop TestService, route_guide's
// RouteGuide and helloworld's Greeter), read from the descriptors compiled into grpc-go, for ghz's
// --protoset. Files written in protobuf editions are restated as proto3
// (route_guide uses edition 2023 with implicit presence, which is proto3's
// wire format and JSON mapping), because ghz's parser predates editions.
package main

import (
	"fmt"
	"os"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"

	helloworld "google.golang.org/grpc/examples/helloworld/helloworld"
	routeguide "google.golang.org/grpc/examples/route_guide/routeguide"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: protoset OUT")
		os.Exit(2)
	}
	set := &descriptorpb.FileDescriptorSet{}
	seen := map[string]bool{}
	var add func(fd protoreflect.FileDescriptor)
	add = func(fd protoreflect.FileDescriptor) {
		if seen[fd.Path()] {
			return
		}
		seen[fd.Path()] = true
		imports := fd.Imports()
		for i := 0; i < imports.Len(); i++ {
			add(imports.Get(i).FileDescriptor)
		}
		set.File = append(set.File, asProto3(protodesc.ToFileDescriptorProto(fd)))
	}
	add(testgrpc.File_grpc_testing_test_proto)
	add(routeguide.File_examples_route_guide_routeguide_route_guide_proto)
	add(helloworld.File_examples_helloworld_helloworld_helloworld_proto)
	out, err := proto.Marshal(set)
	if err != nil {
		fmt.Fprintln(os.Stderr, "protoset:", err)
		os.Exit(1)
	}
	if err := os.WriteFile(os.Args[1], out, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "protoset:", err)
		os.Exit(1)
	}
}

// asProto3 drops edition features from a file that declares an edition.
func asProto3(f *descriptorpb.FileDescriptorProto) *descriptorpb.FileDescriptorProto {
	if f.GetSyntax() != "editions" {
		return f
	}
	f.Syntax = proto.String("proto3")
	f.Edition = nil
	if f.Options != nil {
		f.Options.Features = nil
	}
	for _, m := range f.MessageType {
		if m.Options != nil {
			m.Options.Features = nil
		}
		for _, field := range m.Field {
			if field.Options != nil {
				field.Options.Features = nil
			}
		}
	}
	return f
}
