# tidepool-demo image: the e2e's gRPC backend and load client
# (tests/src/bin/tidepool-demo.rs), nothing but the static binary, uid 65532.
# Built like the operator's and agent's images (see operator/Dockerfile):
#   docker build -f tests/demo.Dockerfile -t tidepool-demo .             (from source)
#   docker build -f tests/demo.Dockerfile --target prebuilt -t tidepool-demo CONTEXT
#                                                          (make images, offline)

FROM scratch AS prebuilt
COPY tidepool-demo /usr/local/bin/tidepool-demo
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tidepool-demo"]

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/release.sh --demo && scripts/check-static.sh tidepool-demo

FROM scratch
COPY --from=build /src/target/x86_64-unknown-linux-gnu/release/tidepool-demo /usr/local/bin/tidepool-demo
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tidepool-demo"]
