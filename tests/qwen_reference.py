"""The Qwen3-Reranker model card's scoring code, verbatim apart from being wrapped in a class
(so the tokenizer, model and ``max_length`` it closes over are per instance): the parity target
of the project's scorer, shared by the reranker and label-pipeline tests."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def format_instruction(instruction, query, doc):
    if instruction is None:
        instruction = 'Given a web search query, retrieve relevant passages that answer the query'
    output = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(instruction=instruction,query=query, doc=doc)  # noqa: E501, UP032
    return output


class CardReference:
    def __init__(self, path, max_length=8192):
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side='left')
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length
        self.token_false_id = tokenizer.convert_tokens_to_ids("no")
        self.token_true_id = tokenizer.convert_tokens_to_ids("yes")
        prefix = "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"  # noqa: E501
        suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        self.prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
        self.suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)

    def process_inputs(self, pairs):
        tokenizer, model, max_length = self.tokenizer, self.model, self.max_length
        prefix_tokens, suffix_tokens = self.prefix_tokens, self.suffix_tokens
        inputs = tokenizer(
            pairs, padding=False, truncation='longest_first',
            return_attention_mask=False, max_length=max_length - len(prefix_tokens) - len(suffix_tokens)
        )
        for i, ele in enumerate(inputs['input_ids']):
            inputs['input_ids'][i] = prefix_tokens + ele + suffix_tokens
        inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
        for key in inputs:
            inputs[key] = inputs[key].to(model.device)
        return inputs

    @torch.no_grad()
    def compute_logits(self, inputs, **kwargs):
        model, token_true_id, token_false_id = self.model, self.token_true_id, self.token_false_id
        batch_scores = model(**inputs).logits[:, -1, :]
        true_vector = batch_scores[:, token_true_id]
        false_vector = batch_scores[:, token_false_id]
        batch_scores = torch.stack([false_vector, true_vector], dim=1)
        batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
        scores = batch_scores[:, 1].exp().tolist()
        return scores

    def scores(self, query_doc_pairs, task=None):
        pairs = [format_instruction(task, query, doc) for query, doc in query_doc_pairs]
        return self.compute_logits(self.process_inputs(pairs))


