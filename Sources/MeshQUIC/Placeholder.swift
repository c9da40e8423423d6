import CNgtcp2
let _x = NGTCP2_PROTO_VER_V1
