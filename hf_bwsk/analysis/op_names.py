"""Names of the aten op families that several rule tables share (S/K rules, CALM mixing), in one place.

Each is a space-separated string, the form the rule tables register names in.
"""

MATMULS = "mm bmm matmul"
BIAS_MATMULS = "addmm baddbmm"
CONVOLUTIONS = "convolution _convolution"
ATTENTIONS = (
    "_scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_flash_attention "
    "_scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention "
    "_scaled_dot_product_fused_attention_overrideable _scaled_dot_product_attention_math "
    "_flash_attention_forward _efficient_attention_forward"
)
SOFTMAXES = "_softmax _safe_softmax _log_softmax"
LAYER_NORMS = "native_layer_norm rms_norm _fused_rms_norm"
REDUCTIONS = (
    "sum mean amax amin max min argmax argmin var var_mean std std_mean prod norm linalg_vector_norm "
    "logsumexp any all count_nonzero topk median mode kthvalue"
)
NLL_LOSSES = "nll_loss_forward nll_loss2d_forward"
ELEMENTWISE_LOSSES = "mse_loss l1_loss smooth_l1_loss huber_loss binary_cross_entropy binary_cross_entropy_with_logits kl_div"
