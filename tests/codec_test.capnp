# A user schema for tests/codec_test.cc: stands in for the structs a procpool user would send.

@0xf802e3d31741a921;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("procpool::testing");

struct Document {
  id @0 :UInt64;
  title @1 :Text;
  tags @2 :List(Text);
  body @3 :Data;
}

# A different struct, to check what decoding into the wrong struct type does.
struct Other {
  count @0 :Int32;
}
