"""The paper's report-cleaning pipeline before slide–report CLIP (Xu et al. 2024, Methods, "Vision–language
alignment"; Xu et al. 2024, Methods: slide-level vision-language alignment): k-means exemplars (:mod:`.exemplars`), an
LLM cleaner on any OpenAI-compatible chat
server (:mod:`.chat_client`, :mod:`.prompt`, :mod:`.cache`, plugin ``llm``), and the before/after record with
token counts and the length histograms (:mod:`.record`). The ``clean_reports`` job (:mod:`.job`) runs it.
See docs/report_cleaning.md.
"""
