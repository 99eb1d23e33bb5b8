"""Text towers (text_encoder hook) and pathology report cleaning (report_cleaner hook) for slide–report
alignment (Xu et al. 2024, Methods: slide-level vision-language alignment)."""
