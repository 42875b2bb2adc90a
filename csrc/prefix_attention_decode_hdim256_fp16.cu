// One template instantiation per file so builds parallelize.
#include "prefix_attention_fwd_launch.cuh"
FASTPROMPT_INSTANTIATE_FWD(__half, 256, fastprompt::PrefixAttnConfig::kDecode)
