"""llama-avsr: Llama-AVSR (Whisper + AV-HuBERT encoders, projectors, LoRA-tuned LLM) for transformers, with the
attention-sink analysis and decorrelation loss of "Mitigating Attention Sinks and Massive Activations in
Audio-Visual Speech Recognition with LLMs"."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration_avhubert import AVHubertConfig
from .configuration_llama_avsr import LlamaAVSRConfig
from .modeling_avhubert import AVHubertForFrameClassification, AVHubertModel
from .modeling_llama_avsr import LlamaAVSRForConditionalGeneration, LlamaAVSRModel, LlamaAVSRPreTrainedModel
from .pipeline_llama_avsr import AudioVisualSpeechRecognitionPipeline, register_pipeline
from .processing_llama_avsr import LlamaAVSRProcessor

__version__ = "0.1.0"

# Installed users get the Auto classes without trust_remote_code; `register_for_auto_class` below writes the
# `auto_map` that lets a process without this package load a saved folder with trust_remote_code=True.
AutoConfig.register(AVHubertConfig.model_type, AVHubertConfig, exist_ok=True)
AutoConfig.register(LlamaAVSRConfig.model_type, LlamaAVSRConfig, exist_ok=True)
AutoModel.register(AVHubertConfig, AVHubertModel, exist_ok=True)
AutoModel.register(LlamaAVSRConfig, LlamaAVSRModel, exist_ok=True)
AutoModelForCausalLM.register(LlamaAVSRConfig, LlamaAVSRForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LlamaAVSRConfig, LlamaAVSRProcessor, exist_ok=True)

# pipeline("audio-visual-speech-recognition", model=...) for installed users.
register_pipeline()

LlamaAVSRConfig.register_for_auto_class()
LlamaAVSRForConditionalGeneration.register_for_auto_class("AutoModelForCausalLM")
LlamaAVSRModel.register_for_auto_class("AutoModel")
LlamaAVSRProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "AudioVisualSpeechRecognitionPipeline",
    "AVHubertConfig",
    "AVHubertForFrameClassification",
    "AVHubertModel",
    "LlamaAVSRConfig",
    "LlamaAVSRForConditionalGeneration",
    "LlamaAVSRModel",
    "LlamaAVSRPreTrainedModel",
    "LlamaAVSRProcessor",
]
