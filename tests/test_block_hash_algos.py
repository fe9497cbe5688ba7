"""Every prefix-caching hash algorithm vLLM 0.32 offers, with its extra keys, against vLLM's own hashes.

Golden vectors, produced by calling vLLM 0.32.0's own code (the CPU build that ``pdgate engine
vllm-setup`` installs into ``.vllm/venv``; cbor2 6.3.0, xxhash 4.1.0 put on its path): for each
algorithm ``vllm.utils.hashing.get_hash_fn_by_name(algo)``, then
``vllm.v1.core.kv_cache_utils.init_none_hash(fn)`` (with ``PYTHONHASHSEED`` unset, or set to
``"42"``; the xxhash algorithms only with it, as they are seeded at random otherwise), then a
``vllm.v1.request.Request`` over :data:`TOKENS` built with the case's ``LoRARequest(lora_name,
lora_int_id=1, lora_path)``, ``cache_salt`` and ``MultiModalFeatureSpec(identifier,
mm_position=PlaceholderRange(offset, length))`` items, hashed by
``kv_cache_utils.get_request_block_hasher(block_size, fn)``: ``request.block_hashes`` are
:data:`GOLDEN`, ``kv_cache_utils.NONE_HASH`` :data:`NONE_HASHES`,
``kv_cache_utils.maybe_convert_block_hash`` :data:`EVENT_HASHES` and
``kv_cache_utils.to_event_extra_keys`` over ``generate_block_hash_extra_keys`` per block
:data:`EVENT_EXTRA_KEYS`. :data:`REAL_VLLM_EVENTS` are block hashes real vLLM 0.32 (CPU build) published
in its KV events, see :func:`test_hashes_equal_what_real_vllm_published`.
"""

from __future__ import annotations

import hashlib
import pickle
import sys

import pytest

from pdgate.common import block_hash as bh
from pdgate.common.block_hash import (
    HASH_ALGOS,
    NONE_HASH_SEED,
    BlockHasher,
    BlockKeys,
    LoraAdapter,
    MmPlaceholder,
    PrefixHasher,
    block_hashes,
    cbor_canonical,
    engine_none_hash_seed,
    hash_function,
    none_hash,
    request_keys,
    resolve_none_hash_seed,
    to_event_hash,
)

pytestmark = pytest.mark.unit

TOKENS = [(i * 7919 + 13) % 32000 for i in range(40)]  # block 16: 2 full blocks + 8; block 8: 5 full
LORA = LoraAdapter("sql-lora", "/adapters/sql")
MM = [MmPlaceholder("img-a", 3, 10), MmPlaceholder("img-b", 14, 4)]
CASES: dict[str, dict] = {
    "plain": {},
    "lora": {"lora": LORA},
    "salt": {"cache_salt": "tenant-1"},
    "lora_salt": {"lora": LORA, "cache_salt": "tenant-1"},
    "mm": {"mm": MM},
    "lora_mm_salt": {"lora": LORA, "mm": MM, "cache_salt": "t"},
}

# fmt: off
NONE_HASHES = {
    ('sha256', None): "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198",
    ('sha256_cbor', None): "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0",
    ('sha256', '42'): "c0bc02c9fc92a4944335649961b9e55cc41b194bece4801e8c6ef0f0f3f5884a",
    ('sha256_cbor', '42'): "9fa6eb003f14425eb9c8e6baacfbcaab26257357b829c7bfa74ffcc4f31c1780",
    ('xxhash', '42'): "b6cdd80ea04b31ad0b9fc22fff500882",
    ('xxhash_cbor', '42'): "a9d2e63407fce1a26c9dc9d7fa2d7caf",
}
GOLDEN = {
    ('sha256', None, 16, 'plain'): ("4ea0bfe8a2588221c781ec067eb776d9bb03bc71bc4b88912977068c5ff2b014", "1e256ac2ec2ef5e428e60f679f55338d5213612e82860b45f47d444b4dc6c9e8",),
    ('sha256', None, 16, 'lora'): ("744e8a13cd5531a9eec70a77389d2df6b6aaa242463393593c0092a67af2608e", "c8ac850379254646d0f76ca0789d11bb7d2999f0a47b31e7d73a194523289454",),
    ('sha256', None, 16, 'salt'): ("7c70ce9bae18a480a3c53661a34c446386bb58785a222c8fd87982c4abca658d", "d3cf86672d0b93dc5e5bf7c8dc4137dfc34b98d49a16708df65b598091f9cd0d",),
    ('sha256', None, 16, 'lora_salt'): ("119b1e63b7f939e5c7188bc4ba6028d3fe290fe5e340bc3e3751ff5760a0e4d8", "4643e0f5a1241695e7161631858f8622dd3d61a9bf686d82214257768e2555e8",),
    ('sha256', None, 16, 'mm'): ("82f4de4c36f2cf1291b648e01e295a9c1e8947753328cf056193eefdc5e6cfb7", "bac772ebdbd4646b4bf000659871c4b63ea4ed9ce0c271645e2fae4f46012613",),
    ('sha256', None, 16, 'lora_mm_salt'): ("861439f94650474a67391c3c486cc5e0b89d2194a437ffeee867edea3eb72dec", "0f47372a9b2fd8a0bb182347ae85aafdfbaadc7fda193c9be9f85cf2cc5c317f",),
    ('sha256', None, 8, 'plain'): ("a01ea98dd94c78bd34d11dd481512957c9a8acb09c5b176a0f704f3dc1472d90", "5b35ce434498e82632b7fe7ff1646d44c45c213f316b229cc1932ae855d6f748", "1c470bed3d86d49d702b733db5a0aee7624a465c053b8c5fc10d3053c7d22c3c", "a02605dd798bf93c498af7614445a14488b45dae6d31c631c1a186f60e482750", "3408bae80b349e16621d777298c3496cb2cb5234fd831e733d6d75bbda21aa6e",),
    ('sha256', None, 8, 'lora_salt'): ("988ed83d66ae56475a6b7512d915752f94775ebc9a29bdc3c861270abe0972b6", "98bf71b135ddfb9e3c30a3e9a96dde647c0b77929b86468e1805fc94631840b1", "36c40cafd47767c15b2cd4c4829a83edddb9220d792e83c256cee00ef49ef64d", "ca6c2d14b4e272227f18a56da595eceff6c98d663991ae618dd668a691b0b6dc", "1d111c11f2fc8cef1b12f6b4621c01dd8cb70ce6a0520ba185aefb4cfd212187",),
    ('sha256', None, 8, 'mm'): ("3fda78009b5359f7ee1cb55e792f5bec2e7d9ba8a4e26c5fdccf977ae043b802", "5d9b4e15185c2e57d16a07736083af5cc8e25e6d728dda85261a35a722789043", "b43eada0b28442afb288e8848da9b7bb762b74809635b64eb33506f9567fbcae", "c8dd841fffa5fe50d061317b1a81adf36d965b96f0d167fff1560dd616050a86", "76b7015d3e4fc162e333fb20784176aa5ec90ddf0f4545c54ddb6345acee6e1e",),
    ('sha256_cbor', None, 16, 'plain'): ("004c366bb040083af7c5581ca33ec9c1dfd474539ccbdd61fe256ce6f6aa1f21", "8460802f156ec3429c0a4e7b39f3b0d849b34c26995f765b0f25d9a970679542",),
    ('sha256_cbor', None, 16, 'lora'): ("272ccbf8cab160ad324a4bec0419f842a6254016e1f6e8dccf5977249b3b74e3", "b460b47d8f3b391ee69aa131d4d462b111da4e9a32d42eed4b5e445e9e0c47e3",),
    ('sha256_cbor', None, 16, 'salt'): ("aeccb1d11d7eea09d68c94dc14d41f1c6ca7f1f5062afbde6656e8f2914a2f79", "b98952929964e0b05f32572b0f37513260666bb95a29643f27d8bc1c55215461",),
    ('sha256_cbor', None, 16, 'lora_salt'): ("0aeae9853e7449db415f7795aafa6cedfe98dec726816e46ea7099d96aab973f", "17783229f783bbe2b72b9eb6e66a9b4b116ac74d762360ed492cd3e4850fb0a2",),
    ('sha256_cbor', None, 16, 'mm'): ("111ad44284a2ebbce2678d8e686f0ff9f6776afefa0c1bc39041a7646cac4fbe", "846599fd5c75e48134d774274f042477600d9ada8dec1cd266924a4424e8820c",),
    ('sha256_cbor', None, 16, 'lora_mm_salt'): ("ccdc584c191fa6a1f4a3e6a5d84ef72725f026afef22f9c5be5c357b25026776", "8d6af0fe94e1c76d5b9a1249ea1633d3caeb07e98a0d45a7ebb5a13f71ef9ede",),
    ('sha256_cbor', None, 8, 'plain'): ("263da08509f749623d1d31674aa08f59f6f610f3c0c160426b5ba1755aaf17af", "8d380f6a08f18cdd7bd910e0c656133913f29e893a31ecc6079e50d56e4520f2", "8ef50469afa5d4047fcf5b0ec8e85bb370b09cf658f66cbfbac8ed7b8dcd25b3", "e9f249e7ca83df2b9ac27ce0d9ce43d39c1b8b461d559666249fc77eb96a917c", "034a7e0912fd3ccf8690d01ee26db6db33f2c5a772e48b4fb989e5de29a82656",),
    ('sha256_cbor', None, 8, 'lora_salt'): ("411210b6cd78f81510b8a8273a11e0c2b24b0a158cd753659d7a2a3d5cee675d", "cb861d281812b8a15525f847c6709545fac770599ae1f07c09b63a4ab90b917a", "978fd8044e842ce42afe1a0bd4f7b977d41d4bd8cc53e727a76796d93a500afb", "32645e10b16dd32c0b83ae0874946b83314777ec2e407e52930fe1a0c7aacc95", "ef5d7cf2316d6b002ba75c75cdafde1a58597ee5f64804322ccc34453a88709e",),
    ('sha256_cbor', None, 8, 'mm'): ("23b614a111a313a588c000934ec9de6dad2fa79467608f122ae3e09af0268d33", "d700a358e0fedb3e299bc9d778bc894eee5a8789a36a9c712850fdbbd12b107c", "cbe1713cee0017c869013b29f8a732d2f52e816194997dfcac9198581b36023e", "573f375ad2d184806fe373757b3b2d5e1de578b2ee2d0ec667458c7d1828f5d1", "29f78518c80cb131440a649270bd1d2c98f00e468c6da28e7e244401b2000d48",),
    ('sha256', '42', 16, 'plain'): ("8c544f965bcb004af7fbcba0cf6e35bdbe1ffdc529e38dce643d0276eb54ff6f", "a3de4dee6f7a5da5582b0638f674ba31441eb51d08ae46b055706dba100b10ed",),
    ('sha256', '42', 16, 'lora'): ("ed43654e3d643b4a3b3a101ae66211b63c7ce08de310382ee43bc35c39777ac2", "a24ff3fcf844015cba36b907431c6145bdfca80f6b52dbf01fdff3131b315587",),
    ('sha256', '42', 16, 'salt'): ("62d28a3ece91aaa19a27de1ef8935d680bfe5c552f50fa30ab8ef80f5c8c9107", "d40b69db7fd605821e3cbd2d9f571f464b0c6c5fbc3f3be2517918e62fb26bb2",),
    ('sha256', '42', 16, 'lora_salt'): ("9d4a3efc7a130edc8615991a0732fa980985fc4223316c36dda686c9cdf52b32", "effa06fa4fa3588a913f700b0b54f3d26eaf4067709098f4e084c9b92ed591d4",),
    ('sha256', '42', 16, 'mm'): ("806245dabc7c806671e2b7522b91d69c5ad80285bf11fb292ac0138280561b75", "0e8e818c7ad71021d14f3d3ae21217e0af7c5875b7bb6f254ebe0a8bb18fbd57",),
    ('sha256', '42', 16, 'lora_mm_salt'): ("39477473e7d570616bf5fbd58be9537b985ce577b87e3dc44881d20c2adabf3f", "568db256069aad482e8d359a0ca0ff9e8ea08bd58a24183cdb5a937d670b4f89",),
    ('sha256', '42', 8, 'plain'): ("e445491fef799393f4291b2ebd663063b44a7ee5d536d59a2dfc174ed378f01e", "ae18232ae1063a335dc42a1ad4fc97364a9d6f5e681f84a3c7262c9babf8808a", "bb9a1bc40ddad894fa568f59b18b30b7382f8c3fcb0a69eb8ab6bcbd47dbe897", "7f5db7a1de849207495f45ca9a1ab4c4cb1e3bccaab07e273add6798e4bd5669", "1539089a9168dbc22decec3978d68c0e791a3830ed0117ee46d97029759583d6",),
    ('sha256', '42', 8, 'lora_salt'): ("2f43009820896143a94ed5ee369fe88fc43713ce39bfa03043761813b731aff2", "8f02bfab69b2c115fc5d8b19d42776958dc3c473fca1ff9e5fa9ab790041fdd1", "dc47e720a73fdda0e96815d89a131c10a8d19f67e04e6c444cea5aa304f7df61", "ca9dad44e54afe73a7a27b2ce3d0eab59a76578accf8b3519f4895ff6b9d88a6", "febd0bdf1f31f88a4759ff61916d0b5b4028e09c8c4d67775c4dc391f99af535",),
    ('sha256', '42', 8, 'mm'): ("34df6a6585bbe5795ed819a41509d0d3e5989fbc89a99719bd2235847e648f14", "9c771fb8ca3001797d7222cf4dfb71b8ced043c2e5c3183ed084324794b88b0c", "98ab70d33aaed89dfab89905249e55bed58433876f30b0a03b693390feb58f17", "a5bf4c1c19b353ce4814bad49cdb7f6a8a129636412100a86c59a12f6340bf98", "1ca6beadd000cb48833c9e21042b3540691793c07f6c115f31bd5aae5a1b55fa",),
    ('sha256_cbor', '42', 16, 'plain'): ("a2ecee4e42399b46278eb087eec29e7fcd7e25bf98bb931c466570fe5ad49a67", "8f073bb232c3e1cba3e94eb1d9a5667f130f0998e20e3d5a5dfb9604bdf2fbed",),
    ('sha256_cbor', '42', 16, 'lora'): ("909ccef6309f54719611cf556b84a712731b16e859c6d30f5361f99c4f624109", "781df8106d47ce783510a382b0e37736168ef614b7df81ef1110a996fe429995",),
    ('sha256_cbor', '42', 16, 'salt'): ("ab5ecec7dc37dfa983885b09fd0526a2f5083f2c161e74dc5e1b9e2bce2bd741", "9946187884e888c8367b79aef39783243b208db39ec705ad4067cc99dd8f8f02",),
    ('sha256_cbor', '42', 16, 'lora_salt'): ("0aede635ec09680b8cd06b275f4b65a219e368884292772e6c93236b065cfef2", "4384d8f496fd5430302cd7ed211f2f77ab5f8d43d29e80ef91ba53b48f109c66",),
    ('sha256_cbor', '42', 16, 'mm'): ("7319d27368cd568fdb7d804dab850a32a6baae01d18e1aea0edc57e7abc3f3d7", "b6ae2b2e9a8153ec85c4aed7712191d38ba0024338bb699ea5708f82a91ec19a",),
    ('sha256_cbor', '42', 16, 'lora_mm_salt'): ("f9d1fe521d8da12affb04685a2c14b78287ec71fa950fb9bd6298c0a586fb83d", "5fe1e121b80c3b0161109c7a47fdc1bd1642e7e3fa94898a5167a65cb46b0b1c",),
    ('sha256_cbor', '42', 8, 'plain'): ("a294f30222d132bb08fe0055abe37cee49fc38367479b9be3f4a4612350e7f85", "bf0d7c313a290f0dac052e64ac611a30a845ec792f1d257bbc2bf2fff45a964f", "65df3a3147b7443b9c4095eb95be2c8035ef6ab44fe54320e5c176e66115de63", "b3f449c6d599c2d16278859096604d2c66b087a1e24e27861247b441425060e7", "3f12fd6229d2538c5b731cb74be1f21314ee76cd0ab3bbce729438daf3032b92",),
    ('sha256_cbor', '42', 8, 'lora_salt'): ("e6722b03b99a3e8bdfc6850ed70de9b3f7cd1ace2a995684fe15a9fde2c38488", "10394a3a83f93feb9e8d3e6668d4ed3391a8af0f4c9a51a25b2517a22ffffe35", "c6450c42c96b0e7f9997461f5ae1d3b29c4cfd5ee109e1b7dcff2a5ab38ba83e", "523ee4c181cdee7cda357bfe4fed62368d337a132e5d293142d76a3ed3d7aecd", "656365a4d0860bafbf89e981ea7dad0649b6d4df6d1ef69b9fd8873105fd7fcc",),
    ('sha256_cbor', '42', 8, 'mm'): ("fe86d14d5cd866222f7b60418807f2a2cd29c068410f43cbcfbad730a279f773", "4aed360c8f1b4975767eeb175bc8ca82939327576f00e04f34aef3a7bd5c5599", "6d3ae9b3256b730a6f4d198fca3d8a88017e5d65711d4e69ab3deef3413da0c2", "fc53666362c6767e918e35fff9741d6b9da3d8de11c8b401748b838b3920e4a1", "5e016cd6a79d9ab1b141f2b04fddadeff00b5790a534b5c40812c505ed0fb911",),
    ('xxhash', '42', 16, 'plain'): ("09f20f6d83a51a6246ae9ca434c1e56b", "d27e406476f7bc0f874552a1ca616c9a",),
    ('xxhash', '42', 16, 'lora'): ("04ff0e0358398250a46d3da1548a6e89", "0d611fd1e0cd5ed5c20e8aa9cad85ba9",),
    ('xxhash', '42', 16, 'salt'): ("36efee1c3db58a07452b992140162a7e", "8fdfe47312adaf38ad6dfa869f01832b",),
    ('xxhash', '42', 16, 'lora_salt'): ("8476b3fc70d8442e7370e279319a8b88", "a3a2496004a712d0e9189f1452debf82",),
    ('xxhash', '42', 16, 'mm'): ("cc48bd504451bb077f39811c56f46c20", "4ecf1d6620a6b4d919a11b5db575c3f6",),
    ('xxhash', '42', 16, 'lora_mm_salt'): ("1008f66bb87561839160f1b1e709fb4c", "cfbe9397333cb38bd5c556657b554cc1",),
    ('xxhash', '42', 8, 'plain'): ("0d7a76638b778d12619239273971c11b", "7dbe77dbcf78d245e8c8f03176b4179a", "03f6cf83606f4dffb9dcfad6d1c63b8d", "c3c312dc500ba4bc4036ac0e2df905ec", "f176f1cc70872fbabfc59e8130d065b7",),
    ('xxhash', '42', 8, 'lora_salt'): ("f969dfbadfa8c6a7caf1f8e567dcd6ab", "b886b29286bbae2fdd35ffbc50ea6362", "7e8fc34bb2b83e8d39fd0ecc1aa94018", "bda0d711908e85b522a596ac3d2f14ac", "85f435e6bd62b3a9947cf031a184b118",),
    ('xxhash', '42', 8, 'mm'): ("ac79d914945405cf4a58656fe04766e4", "6aaa5a316726c15a0025802bff0d7ee7", "1216e841fc2a76d033b0a45868343c7f", "e0d99ebf33828cd130d30d690718870d", "a1b132c9465ab3fb4d81bd9edb8d94d0",),
    ('xxhash_cbor', '42', 16, 'plain'): ("67cdc86ac3271a8830c8c1fcb0f3e8e2", "bda270c56d4f70b48e2f52b649a15299",),
    ('xxhash_cbor', '42', 16, 'lora'): ("294c5b166193af8e5920bced41550f24", "7181f50e61a5725a3c4fc29c473a3a90",),
    ('xxhash_cbor', '42', 16, 'salt'): ("019d8c0f7f56254b69a795e570a85231", "298855c9664bdcad1163088d9cac1928",),
    ('xxhash_cbor', '42', 16, 'lora_salt'): ("d82205fd43f1b5038db3d38fe7ec618e", "7f388b070a26b16ee5a5803c97c85aa2",),
    ('xxhash_cbor', '42', 16, 'mm'): ("8ed69b854a3dc0c9af76a363239531bb", "b151392ac3efe369a0398fd3841f5959",),
    ('xxhash_cbor', '42', 16, 'lora_mm_salt'): ("d8c62a8203d6cbbabe0e9e3bd1daa824", "e1f06317851b001b476190e2fe40cbfc",),
    ('xxhash_cbor', '42', 8, 'plain'): ("1f73ecf8426ac3ed43886def207d3a05", "079095183f183252016b3d90f333dc9d", "041a1cdef0b005c3339782e5dd975ed6", "4844b0ee05d4e1656196d28aed43f79c", "ae2fd6366e762df6525d1c3577313aae",),
    ('xxhash_cbor', '42', 8, 'lora_salt'): ("5da108c5d48a461c7b13c605c30b4c22", "39f6ab9e9ec7a9020582ec3b32665ecd", "23bfe5f7d8fd3b17e70c189f6e796a66", "34045fa7b80a411f728a669e2c75c549", "68b82d4749ae687dda466eaf2b8c05a4",),
    ('xxhash_cbor', '42', 8, 'mm'): ("06da066333e594cee41ec02e3a8db57b", "9b05ac5558ed6dd75763bb4fd683f1fa", "7d88eb0efcbf97453c8b0f7562deda76", "f819c6660941a27b5e3df392d63f12c0", "0f068a865a19bb15da5f0f051ac041fd",),
}
EVENT_EXTRA_KEYS = {
    (16, 'plain'): [None, None],
    (16, 'lora'): [['sql-lora'], ['sql-lora']],
    (16, 'salt'): [['tenant-1'], None],
    (16, 'lora_salt'): [['sql-lora', 'tenant-1'], ['sql-lora']],
    (16, 'mm'): [[['img-a', 3], ['img-b', 14]], [['img-b', -2]]],
    (16, 'lora_mm_salt'): [['sql-lora', ['img-a', 3], ['img-b', 14], 't'], ['sql-lora', ['img-b', -2]]],
    (8, 'plain'): [None, None, None, None, None],
    (8, 'lora_salt'): [['sql-lora', 'tenant-1'], ['sql-lora'], ['sql-lora'], ['sql-lora'], ['sql-lora']],
    (8, 'mm'): [[['img-a', 3]], [['img-a', -5], ['img-b', 6]], [['img-b', -2]], None, None],
}
EVENT_HASHES = {
    ('sha256', None): [3986247895947994328, 2396574118417094120],
    ('sha256_cbor', None): [16893171361343313727, 5272822242182410402],
    ('sha256', '42'): [15971601329817987890, 16178277558613545428],
    ('sha256_cbor', '42'): [7823635920247914226, 10500797516127181926],
    ('xxhash', '42'): [8318397521904438152, 16796349719916756866],
    ('xxhash_cbor', '42'): [10210737395203858830, 16547773403575638690],
}
# fmt: on

REAL_VLLM_PROMPT = list(range(10, 80))  # 70 token ids: two full blocks of 32
REAL_VLLM_EVENTS = {
    # `pdgate engine vllm --model .vllm/tiny-model --served-model-name tiny --block-size 32
    #  --kv-events-endpoint 'tcp://*:PORT' --extra-args "--enable-lora --max-loras 2 --max-lora-rank 8
    #  --lora-modules a1=/tmp/lora/a1 --prefix-caching-hash-algo ALGO"` (VLLM_ALLOW_RUNTIME_LORA_UPDATING=1;
    # a2 loaded at runtime from /tmp/lora/a2), completions of REAL_VLLM_PROMPT with max_tokens 1:
    # BlockStored.block_hashes per (algo, PYTHONHASHSEED, model, cache_salt).
    ("sha256_cbor", None, None, None): [7513423537032978964, 8324879166139141864],
    ("sha256_cbor", None, "a1", None): [3089275150395619718, 12454229276911865732],
    ("sha256_cbor", None, None, "s1"): [6004387443624285000, 1064539626082428984],
    ("sha256_cbor", None, "a1", "s1"): [8185814744786794749, 9752164829381313893],
    ("sha256_cbor", None, "a2", None): [11978786021266105551, 14138762179729575488],
    ("xxhash", "123", None, None): [10389165455835581985, 13568028048952145428],
    ("xxhash", "123", "a1", None): [4161480386987397736, 10507063567627558960],
    ("xxhash", "123", None, "s1"): [5671631065874643811, 12030511201141350126],
    ("xxhash", "123", "a1", "s1"): [7224914266684663132, 6571421139970048234],
    ("xxhash", "123", "a2", None): [13399534040283450192, 2974539166185464596],
}


@pytest.fixture(autouse=True)
def _no_hash_seed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)


def _needs(algo: str) -> None:
    if algo.startswith("xxhash"):
        pytest.importorskip("xxhash", reason="the xxhash algorithms need pdgate[xxhash]")


@pytest.mark.parametrize(("algo", "seed", "block_size", "case"), sorted(GOLDEN, key=str))
def test_chains_equal_vllms_own_hashes(algo: str, seed: str | None, block_size: int, case: str) -> None:
    _needs(algo)
    expected = list(GOLDEN[(algo, seed, block_size, case)])
    got = block_hashes(TOKENS, block_size, algo=algo, seed=seed, **CASES[case])
    assert [h.hex() for h in got] == expected
    # the incremental hasher, fed in uneven pieces, agrees
    hasher = BlockHasher(block_size, algo=algo, seed=seed, **CASES[case])
    for piece in (TOKENS[:5], TOKENS[5:19], TOKENS[19:]):
        hasher.extend(piece)
    assert [h.hex() for h in hasher.hashes] == expected
    # and a chain continued from its first block (parent + start) too
    tail = block_hashes(
        TOKENS[block_size:], block_size, algo=algo, seed=seed, parent=got[0], start=block_size, **CASES[case]
    )
    assert [h.hex() for h in tail] == expected[1:]


@pytest.mark.parametrize(("algo", "seed"), sorted(NONE_HASHES, key=str))
def test_none_hash_equals_vllms(algo: str, seed: str | None) -> None:
    _needs(algo)
    assert none_hash(seed, algo).hex() == NONE_HASHES[(algo, seed)]
    assert PrefixHasher.create(algo, seed).root.hex() == NONE_HASHES[(algo, seed)]


@pytest.mark.parametrize(("algo", "seed"), sorted(EVENT_HASHES, key=str))
def test_event_hashes_are_the_low_64_bits_for_every_algorithm(algo: str, seed: str | None) -> None:
    _needs(algo)
    got = block_hashes(TOKENS, 16, algo=algo, seed=seed, **CASES["lora_salt"])
    assert [to_event_hash(h) for h in got] == EVENT_HASHES[(algo, seed)]
    assert all(len(h) == (16 if algo.startswith("xxhash") else 32) for h in got)


@pytest.mark.parametrize(("block_size", "case"), sorted(EVENT_EXTRA_KEYS, key=str))
def test_event_extra_keys_are_vllms_untagged_form(block_size: int, case: str) -> None:
    keys = request_keys(**CASES[case])
    n = len(TOKENS) // block_size
    got = [keys.event_extra_keys(i * block_size, (i + 1) * block_size) for i in range(n)]

    def as_lists(value: object) -> object:  # the golden values went through JSON
        return [as_lists(v) for v in value] if isinstance(value, (list, tuple)) else value

    assert as_lists(got) == EVENT_EXTRA_KEYS[(block_size, case)]


@pytest.mark.parametrize(("algo", "seed", "model", "salt"), sorted(REAL_VLLM_EVENTS, key=str))
def test_hashes_equal_what_real_vllm_published(algo: str, seed: str | None, model: str | None, salt: str | None):
    _needs(algo)
    lora = None if model is None else LoraAdapter(model, f"/tmp/lora/{model}")
    got = block_hashes(REAL_VLLM_PROMPT, 32, algo=algo, seed=seed, lora=lora, cache_salt=salt)
    assert [to_event_hash(h) for h in got] == REAL_VLLM_EVENTS[(algo, seed, model, salt)]


def test_extra_keys_are_vllms_tagged_tuples_per_block() -> None:
    keys = request_keys(lora=LORA, cache_salt="s", mm=[MM[1], MM[0]])  # sorted by offset here
    assert keys.extra_keys(0, 16) == (
        ("lora", "sql-lora", "/adapters/sql"),
        ("mm", "img-a", 3),
        ("mm", "img-b", 14),
        ("cache_salt", "s"),
    )
    assert keys.extra_keys(16, 32) == (("lora", "sql-lora", "/adapters/sql"), ("mm", "img-b", -2))
    assert keys.extra_keys(32, 48) == (("lora", "sql-lora", "/adapters/sql"),)
    assert request_keys(cache_salt="s").extra_keys(16, 32) is None  # the salt only keys the first block
    assert request_keys() is bh.NO_KEYS and BlockKeys().extra_keys(0, 16) is None
    assert request_keys(cache_salt="").empty  # vLLM ignores an empty salt (and its API refuses one)


def test_the_lora_key_includes_the_adapter_path() -> None:
    """vLLM 0.32 keys ("lora", name, path): a name re-pointed at another adapter shares no block."""
    a = block_hashes(TOKENS, 16, lora=LoraAdapter("x", "/one"))
    assert a != block_hashes(TOKENS, 16, lora=LoraAdapter("x", "/two"))
    assert a != block_hashes(TOKENS, 16, lora=LoraAdapter("y", "/one"))
    assert a != block_hashes(TOKENS, 16)


def test_equal_strings_hash_alike_whatever_object_holds_them() -> None:
    """pickle memoises an object met twice; the keys copy every caller's string, as vLLM's come from JSON."""
    same = "adapter-one"
    twice = block_hashes(TOKENS, 16, lora=LoraAdapter(same, same))
    apart = block_hashes(TOKENS, 16, lora=LoraAdapter(same, "".join(["adapter-", "one"])))
    assert twice == apart
    named_like_the_tag = block_hashes(TOKENS, 16, lora=LoraAdapter("lora", "/p"))
    parsed = block_hashes(TOKENS, 16, lora=LoraAdapter("".join(["lo", "ra"]), "/p"))
    assert named_like_the_tag == parsed
    sha = lambda obj: hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()
    fresh = ("".join(["lo", "ra"]), "".join(["/", "p"]))
    assert parsed[0] == sha((none_hash(), tuple(TOKENS[:16]), (("lora", *fresh),)))


def test_seed_rules_per_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's resolve_none_hash_seed: PYTHONHASHSEED, else the fixed seed for sha256*, random for xxhash*."""
    assert resolve_none_hash_seed(None, "sha256") == resolve_none_hash_seed(None, "sha256_cbor") == NONE_HASH_SEED
    assert engine_none_hash_seed("sha256_cbor") == NONE_HASH_SEED
    with pytest.raises(ValueError, match="PYTHONHASHSEED"):
        resolve_none_hash_seed(None, "xxhash")  # no one outside the engine can know its random seed
    assert resolve_none_hash_seed("7", "xxhash_cbor") == "7"
    drawn = {engine_none_hash_seed("xxhash") for _ in range(3)}
    assert len(drawn) == 3 and all(len(s) == 64 for s in drawn)  # os.urandom(32).hex(), per process
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    for algo in HASH_ALGOS:
        assert resolve_none_hash_seed(None, algo) == engine_none_hash_seed(algo) == "0"
    assert resolve_none_hash_seed("x", "sha256") == "x"  # an explicit seed wins


def test_unknown_algorithm_and_missing_xxhash(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="sha256_cbor"):
        hash_function("md5")
    with pytest.raises(ValueError, match="unknown"):
        block_hashes(TOKENS, 16, algo="sha1")
    bh._xxh3_128.cache_clear()
    monkeypatch.setitem(sys.modules, "xxhash", None)  # the package absent: importing it fails
    try:
        with pytest.raises(ModuleNotFoundError, match=r"pdgate\[xxhash\]"):
            block_hashes(TOKENS, 16, algo="xxhash_cbor", seed="1")
    finally:
        bh._xxh3_128.cache_clear()


def test_cbor_encoder_is_canonical_cbor() -> None:
    """Byte-exact against RFC 8949's examples (cbor2's canonical output, checked against cbor2 itself
    over random block keys when the vectors were made)."""
    cases = [
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (1000, "1903e8"),
        (2**32, "1b0000000100000000"),
        (2**64, "c249010000000000000000"),
        (-1, "20"),
        (-1000, "3903e7"),
        (-(2**64) - 1, "c349010000000000000000"),
        (None, "f6"),
        (True, "f5"),
        (b"\x01\x02", "420102"),
        ("IETF", "6449455446"),
        ("\u00fc", "62c3bc"),
        ((1, [2, 3]), "8201820203"),
        ((), "80"),
    ]
    for value, encoded in cases:
        assert cbor_canonical(value).hex() == encoded, value
    with pytest.raises(TypeError):
        cbor_canonical(1.5)
    key = (none_hash(algo="sha256_cbor"), (1, 2), (("lora", "a", "/p"),))
    assert hash_function("sha256_cbor")(key) == hashlib.sha256(cbor_canonical(key)).digest()


def test_numpy_token_ids_hash_like_python_ints() -> None:
    np = pytest.importorskip("numpy")
    for algo in ("sha256", "sha256_cbor"):
        assert block_hashes(np.array(TOKENS), 16, algo=algo) == block_hashes(TOKENS, 16, algo=algo)
